import os
import sys


def add( a,b ):
    return a+b
class Thing :
    def __init__(self,x):
        self.x=x
    def long_method_name_that_goes_on(self, first_argument, second_argument, third_argument):
        return first_argument  +second_argument
def untidy():
  y = 1 ;z=2
  return y==z  
